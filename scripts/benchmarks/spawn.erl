%% spawn: cost of spawn + exit of a trivial process, in microseconds each.
%% The Erlang twin of spawn.lua; see BENCHMARKS.md.
%%
%% Args (key=value): n (processes per repetition), batch (processes alive at
%% once), reps (repetitions; the median is reported).
%% Primary figure: spawn_monitor of a fun that returns at once, waiting for
%% every 'DOWN', so each process has fully exited before it is counted.
%% Detail figure: spawn of a fun that sends one message to the parent.
-module(spawn).
-export([main/0, main/1]).

main() -> main([]).

main(Args) ->
    N = arg(Args, "n", 100000),
    B = arg(Args, "batch", 1000),
    Reps = arg(Args, "reps", 3),
    run_monitor(B, B),                       % warm-up
    Mon = median([run_monitor(N, B) || _ <- lists:seq(1, Reps)]),
    Msg = median([run_message(N, B) || _ <- lists:seq(1, Reps)]),
    io:format("detail spawn_monitor+DOWN ~.3f us, spawn+message ~.3f us (n=~b batch=~b median of ~b)~n",
              [Mon, Msg, N, B, Reps]),
    io:format("RESULT name=spawn value=~.3f unit=us~n", [Mon]),
    io:format("RESULT name=spawn_msg value=~.3f unit=us~n", [Msg]),
    erlang:halt(0).

%% Microseconds per process, monitors.
run_monitor(N, B) ->
    T0 = erlang:monotonic_time(nanosecond),
    mon_batches(N div B, B),
    (erlang:monotonic_time(nanosecond) - T0) / 1000 / ((N div B) * B).

mon_batches(0, _) -> ok;
mon_batches(K, B) -> mon_spawn(B), mon_wait(B), mon_batches(K - 1, B).

mon_spawn(0) -> ok;
mon_spawn(I) -> spawn_monitor(fun() -> ok end), mon_spawn(I - 1).

mon_wait(0) -> ok;
mon_wait(I) -> receive {'DOWN', _, process, _, _} -> mon_wait(I - 1) end.

%% Microseconds per process, a message back to the parent.
run_message(N, B) ->
    T0 = erlang:monotonic_time(nanosecond),
    msg_batches(N div B, B, self()),
    (erlang:monotonic_time(nanosecond) - T0) / 1000 / ((N div B) * B).

msg_batches(0, _, _) -> ok;
msg_batches(K, B, P) -> msg_spawn(B, P), msg_wait(B), msg_batches(K - 1, B, P).

msg_spawn(0, _) -> ok;
msg_spawn(I, P) -> spawn(fun() -> P ! done end), msg_spawn(I - 1, P).

msg_wait(0) -> ok;
msg_wait(I) -> receive done -> msg_wait(I - 1) end.

median(L) -> lists:nth((length(L) + 1) div 2, lists:sort(L)).

arg([], _, Default) -> Default;
arg([A | Rest], Key, Default) ->
    case string:split(A, "=") of
        [Key, V] -> list_to_integer(V);
        _ -> arg(Rest, Key, Default)
    end.
