from freezetune.cli import run

run()
