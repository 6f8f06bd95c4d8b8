"""What trains: freezing by spec, BatchNorm and dropout in the frozen parts, progressive unfreezing."""
