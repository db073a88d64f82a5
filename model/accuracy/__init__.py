"""The accuracy benchmark (RESULTS.md; speed is BENCHMARKS.md): protocols and splits
(:mod:`.protocols`), the methods compared (:mod:`.methods`), running them (:mod:`.harness`) and
the report (:mod:`.report`)."""
