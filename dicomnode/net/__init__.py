"""All DICOM on the wire: the receiver (Storage SCP) and what it checks before it acknowledges
(`validation`), the sender (Storage SCU), STOW-RS to DICOMweb destinations (`stow`), the choice
between the two by destination (`outbound`), DICOM TLS and TCP_NODELAY (`tls`), and the status
codes both sides answer with and read (`status`)."""
