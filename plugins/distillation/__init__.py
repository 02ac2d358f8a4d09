"""The distillation family: a student learns from a frozen teacher, by aligning hidden
states layer by layer (``hidden_alignment``) or by matching softened output distributions
(``logit_distillation``); both run a teacher bound by the host the same way."""
