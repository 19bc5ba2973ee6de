from keyq.cli import main

main()
