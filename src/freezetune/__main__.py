from freezetune.cli.main import run

run()
