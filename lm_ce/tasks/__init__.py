"""Tasks other than perplexity: multiple choice as lm-evaluation-harness and llama.cpp score it, and word surprisal
as psycholinguists use it, on the run's processes, shards and resume.

May import: errors, config, data, model, sums, rundir, scoring
"""
