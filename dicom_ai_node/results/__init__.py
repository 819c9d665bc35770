"""Result objects: DICOM SEG and TID 1500 SR built with highdicom, with derived UIDs."""
