//! `meshless`: the node agent and its command-line tools (see `meshless --help`).

fn main() {
    meshless::cli::main()
}
