# Examples that need no nixpkgs: every builder is /bin/sh (busybox works:
# build with --option sandbox-paths /bin/sh=/bin/busybox where /bin/sh is
# not static). `kiln build -f examples/default.nix` builds them all.
let
  sh = name: deps: script: derivation {
    inherit name deps;
    # Found when the build runs unsandboxed; a sandbox with busybox as
    # /bin/sh runs the applets whatever PATH says.
    PATH = "/usr/bin:/bin";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
  };
in rec {
  greeting = sh "greeting" [ ] ''
    echo "writing a greeting"
    mkdir -p $out/share
    echo "Hello from a Kiln agent" > $out/share/greeting
  '';
  shout = sh "shout" [ greeting ] ''
    echo "shouting the greeting from ${greeting}"
    mkdir -p $out/bin
    printf '#!/bin/sh\necho "%s!"\n' "$(cat ${greeting}/share/greeting)" > $out/bin/shout
    chmod +x $out/bin/shout
  '';
  docs = derivation {
    name = "docs";
    PATH = "/usr/bin:/bin";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    outputs = [ "out" "man" ];
    args = [ "-c" "echo 'two outputs'; mkdir -p $out $man; echo readme > $out/README; echo page > $man/page.1" ];
  };
  all = sh "examples" [ shout docs ] ''
    mkdir -p $out
    for d in $deps; do echo $d >> $out/parts; done
  '';
}
