from bulkinfer.console import entry

entry()
