%% ring: message passing around a ring of processes, nanoseconds per hop.
%% The Erlang twin of ring.lua; see BENCHMARKS.md.
%%
%% Args (key=value): n (processes in the ring), rounds (times the message
%% goes round), reps (repetitions; the median is reported), small (a second
%% ring of that many processes, default 10, the same number of hops).
%% The message is a small map #{hop => H, from => Pid}, the nearest thing to
%% the Lua table {hop = h, from = pid}; each node builds a fresh one per hop.
-module(ring).
-export([main/0, main/1]).

main() -> main([]).

main(Args) ->
    N = arg(Args, "n", 1000),
    Rounds = arg(Args, "rounds", 1000),
    Reps = arg(Args, "reps", 3),
    Small = arg(Args, "small", 10),
    measure("ring", N, Rounds, Reps),
    measure("ring_small", Small, max(1, (N * Rounds) div Small), Reps),
    erlang:halt(0).

measure(Name, N, Rounds, Reps) ->
    run(N, 10),                              % warm-up
    Ns = median([run(N, Rounds) || _ <- lists:seq(1, Reps)]),
    io:format("detail n=~b rounds=~b hops=~b median of ~b: ~.1f ns/hop~n",
              [N, Rounds, N * Rounds, Reps, Ns]),
    io:format("RESULT name=~s value=~.1f unit=ns~n", [Name, Ns]).

run(N, Rounds) ->
    Main = self(),
    Hops = N * Rounds,
    Nodes = [spawn(fun() -> node(Main, Hops) end) || _ <- lists:seq(1, N)],
    [First | _] = Nodes,
    lists:foreach(fun({P, Next}) -> P ! {next, Next} end,
                  lists:zip(Nodes, tl(Nodes) ++ [First])),
    T0 = erlang:monotonic_time(nanosecond),
    First ! #{hop => 0, from => Main},
    receive done -> ok end,
    T1 = erlang:monotonic_time(nanosecond),
    First ! {stop, N},
    receive stopped -> ok end,
    (T1 - T0) / Hops.

node(Main, Hops) ->
    receive {next, Next} -> loop(Next, Main, Hops) end.

loop(Next, Main, Hops) ->
    receive
        #{hop := Hops} -> Main ! done, loop(Next, Main, Hops);
        #{hop := H} -> Next ! #{hop => H + 1, from => self()}, loop(Next, Main, Hops);
        {stop, 1} -> Main ! stopped;
        {stop, K} -> Next ! {stop, K - 1}
    end.

median(L) -> lists:nth((length(L) + 1) div 2, lists:sort(L)).

arg([], _, Default) -> Default;
arg([A | Rest], Key, Default) ->
    case string:split(A, "=") of
        [Key, V] -> list_to_integer(V);
        _ -> arg(Rest, Key, Default)
    end.
