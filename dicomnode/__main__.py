from dicomnode.cli import main

main()
