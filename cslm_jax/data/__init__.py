"""Data: record formats, templates and the CSLM loss mask (formats); SeqIO sources, packing and the batch iterator (pipeline)."""
