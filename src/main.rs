use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Keeps Matrix accounts on a Synapse homeserver in line with MatrixUser resources.
#[derive(Parser)]
#[command(name = "matrix-user-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions (Homeserver, MatrixUser) as YAML.
    Crd,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => match matrix_user_operator::api::crds_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: cannot render the CRDs: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
