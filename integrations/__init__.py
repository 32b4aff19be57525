"""The method inside other people's code: integrations.hf (the signals of any transformers causal LM)
and integrations.trl (attention credit inside TRL's GRPOTrainer). transformers is a dependency of
these modules only; TRL of integrations.trl only."""
