"""What is optimised: log-probs of the scored tokens, the LM head on them, the losses, the methods."""
