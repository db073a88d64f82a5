"""Training: settings (:mod:`.config`), optimiser and schedule (:mod:`.optim`), resumable states
(:mod:`.state`), the shared loop (:mod:`.loop`), how models start (:mod:`.initialisation`), and the
two stages with their objectives (:mod:`.pretraining`, :mod:`.finetuning`)."""
