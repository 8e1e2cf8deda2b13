"""One module per stage. Each reads its inputs from the run store and writes its
outputs, with its `stages` marker, in one transaction; a stage already marked
done is skipped."""
