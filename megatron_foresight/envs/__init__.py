"""Environments the agent acts in, behind one interface (`base`): search (a retriever over a
corpus) and math (calculator + verifier)."""
