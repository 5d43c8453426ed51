"""The model as a graph: tracing the conv chain, merge math, and rewriting networks from plans."""
