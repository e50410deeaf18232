%% call: a gen_server:call's round trip, in microseconds, with an empty
%% mailbox and with `backlog` unrelated messages queued in the caller. The
%% Erlang twin of call.lua; see BENCHMARKS.md.
%%
%% Args (key=value): n (calls per repetition), backlog, reps (the median is
%% reported). OTP 24 and later start the call's receive past the messages
%% queued before it (the receive marker).
-module(call).
-behaviour(gen_server).
-export([main/0, main/1]).
-export([init/1, handle_call/3, handle_cast/2]).

main() -> main([]).

main(Args) ->
    N = arg(Args, "n", 100000),
    Backlog = arg(Args, "backlog", 10000),
    Reps = arg(Args, "reps", 3),
    {ok, Echo} = gen_server:start(?MODULE, 0, []),
    run(Echo, 1000),                          % warm-up
    Plain = median([run(Echo, N) || _ <- lists:seq(1, Reps)]),
    [self() ! {unrelated, I} || I <- lists:seq(1, Backlog)],
    Queued = median([run(Echo, N) || _ <- lists:seq(1, Reps)]),
    {message_queue_len, Backlog} = process_info(self(), message_queue_len),
    io:format("detail gen_server:call ~.3f us, with ~b messages queued ~.3f us (n=~b median of ~b)~n",
              [Plain, Backlog, Queued, N, Reps]),
    io:format("RESULT name=call value=~.3f unit=us~n", [Plain]),
    io:format("RESULT name=call_backlog value=~.3f unit=us~n", [Queued]),
    erlang:halt(0).

init(State) -> {ok, State}.
handle_call(Req, _From, State) -> {reply, Req, State}.
handle_cast(_, State) -> {noreply, State}.

run(Echo, N) ->
    T0 = erlang:monotonic_time(nanosecond),
    calls(Echo, N),
    (erlang:monotonic_time(nanosecond) - T0) / 1000 / N.

calls(_, 0) -> ok;
calls(Echo, I) -> I = gen_server:call(Echo, I), calls(Echo, I - 1).

median(L) -> lists:nth((length(L) + 1) div 2, lists:sort(L)).

arg([], _, Default) -> Default;
arg([A | Rest], Key, Default) ->
    case string:split(A, "=") of
        [Key, V] -> list_to_integer(V);
        _ -> arg(Rest, Key, Default)
    end.
