from bulkinfer.cli import entry

entry()
