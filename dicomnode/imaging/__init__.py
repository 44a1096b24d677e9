"""Images as numbers: header facts, the slice-stack rule, volumes in patient coordinates, SUVbw
and lesion measures. pydicom, numpy and SimpleITK; no database, no network."""
