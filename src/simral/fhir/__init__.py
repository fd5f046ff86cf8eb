"""FHIR adapter: IHE PDQm (ITI-78) and PIXm (ITI-83) over the regional patient index, under ``/fhir``."""
