from bulkinfer.cli import main

main()
