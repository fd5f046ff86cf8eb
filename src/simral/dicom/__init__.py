"""DICOM foundations: header parsing, JSON model, matching, transcoding."""
