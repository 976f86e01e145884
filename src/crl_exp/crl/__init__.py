"""Control Reinforcement Learning: the actor-critic policy, rollouts, PPO, Adaptive Feature Masking, Lightning."""
