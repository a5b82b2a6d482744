"""What the DICOM port does around pynetdicom, by concern (each module reads on its own):

- `server.py`: the association server (TCP_NODELAY, the bound on connections not yet associating,
  one shared copy of the supported presentation contexts);
- `messages.py`: the order of DIMSE message fragments and what one message may carry: the one place
  that enforces "one C-STORE, one file" (the spool belongs to one message and ends with it);
- `spool.py`: a C-STORE data set written to a file as it arrives, hashed on the way;
- `pixel_scan.py`: the Pixel Data length declared in a data set's first bytes;
- `dimse_codec.py`: the command sets the fast path reads and writes by hand;
- `pdu_reader.py`: the fast path's PDU reader (PT_INGEST_FAST_PATH=true);
- `library_path.py`: the same message rules on pynetdicom's own path (PT_INGEST_FAST_PATH=false);
- `reactor.py`: the two reactor threads of an association woken by work instead of polling (fast path);
- `activity.py`: what an association is doing, for the choice of whom to close at the limit;
- `internals.py`: the start-up check of every pynetdicom internal the fast path touches.
"""
