"""Running a job: connecting to Ray, the passes (transcription, divergence analysis), scheduling
and placement, the workers, the dataset they read and the artifacts shipped to the nodes."""
