"""Everything that goes back to the PACS, one module per object family as highdicom does it:
the SEG (`seg`), the TID 1500 SR of PET lesions (`sr`) or of segment volumes (`segment_sr`),
the RT Structure Set (`rtstruct`), the secondary capture of the PET MIP (`sc`, drawn by
`preview`), the label codes (`labelcodes`); `common` holds what they share and `writer` builds
a job's objects together."""
