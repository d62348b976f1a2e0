"""WSOL at scale: methods, metrics, data and training for weakly supervised object localization."""
