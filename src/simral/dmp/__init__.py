"""DMP publication and the DRIM-M image source (DESIGN.md §8): the KOS manifest, the publication
jobs and their state per document, and the WADO-RS checks for DRIM-M consumers."""
