"""The measurements: probes, tidy records, outcomes of a run, noise floors and paired statistics."""
