"""What people see while they wait: progress bars or log lines (progress), and the one-line records
of training (lines)."""
