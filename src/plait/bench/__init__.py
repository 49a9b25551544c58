"""`plait bench`: named cases (model x plan x world x precision) run through the A/B harness."""
