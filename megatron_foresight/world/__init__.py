"""The built-in world of the embedded default, generated from a seed with no downloads: a
fictional knowledge base and its corpus (`kb`), questions and word problems over it (`tasks`),
scripted agents that play the environments (`agents`), and the command that writes it all
(`build`)."""
