from hssl_cli.cli import main

main()
