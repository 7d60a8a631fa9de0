"""Meta-World MT10 closed loop: environments, expert demonstrations, training on them, evaluation."""
