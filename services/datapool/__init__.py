"""The datapool service. Trajectories on Kafka served as windowed-FIFO batches."""
