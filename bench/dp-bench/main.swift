print("dp-bench: not yet")
