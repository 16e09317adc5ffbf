"""Long-context evaluation (``megamix eval``, docs/eval.md): generation with a KV cache and recurrent
state, the synthetic suite (passkey, needle in a haystack, phonebook, RULER tasks), perplexity by length
and position, plots, and an lm-evaluation-harness adapter (:mod:`megamix.eval.lm_eval_adapter`)."""
