"""HL7 v2 adapter: MLLP listener, ADT patient-identity feed (IHE PAM, French national extension) and
patient demographics queries (IHE PDQ ITI-21)."""
