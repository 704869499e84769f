"""What tests share: real processes (host agent, guest daemon) and a wire-level test guest."""
