"""AJPQ's building blocks: the RL environments, budget wall and policy space (env.py)."""
