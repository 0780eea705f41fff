"""The diagnosis: the rule engine and the generic rules that name why an answer did not change."""
