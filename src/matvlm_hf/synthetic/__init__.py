"""The synthetic world: data, teacher from scratch, quickstart, study, benchmarks and reports."""
