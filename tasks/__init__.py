"""SeqIO task and mixture registrations (data definitions only, no training code).

Registrations arrive with the data issue; importing this package registers nothing yet.
"""
