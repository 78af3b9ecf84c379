"""What every trainer shares: the losses and the epoch-end verdict."""
