from tokenrelay.cli import main

main()
