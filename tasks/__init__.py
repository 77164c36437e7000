"""SeqIO task and mixture registrations for CSLM (data definitions only, no training code)."""
