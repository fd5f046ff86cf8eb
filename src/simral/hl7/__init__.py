"""HL7 v2 adapter: MLLP listener and ADT patient-identity feed (IHE PAM, French national extension)."""
