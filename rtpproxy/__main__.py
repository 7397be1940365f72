from rtpproxy.cli import main

main()
