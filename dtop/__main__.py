from dtop.cli.train import main

main()
