"""Reinforcement learning from simulated rollouts (issue #12): advantage estimators, policy-gradient
losses and the stochastic samplers that give each VLA family tractable log-probabilities."""
